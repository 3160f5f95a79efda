// raycurv lookup UI: runs, a run's summary figures, a gallery of its most (or least) memorized
// samples, and one sample's page. Plain DOM, no dependencies. Everything shown comes from the
// service's JSON API; the bearer token lives in this tab's sessionStorage and travels only in the
// Authorization header. Higher curvature = more memorized; rank 1 = the highest curvature.
"use strict";

const TOKEN_KEY = "raycurv.token";
const PAGE_SIZES = [12, 24, 48, 96];
const SVG_NS = "http://www.w3.org/2000/svg";
const blobUrls = [];
let renderSerial = 0;

// --- small DOM helpers (text only: nothing from the service is parsed as HTML) --------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children.flat(Infinity)) if (child) node.append(child);
  return node;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return Number(value.toPrecision(digits)).toString();
}

function runHref(run, ...parts) {
  return "#/runs/" + [encodeURIComponent(run), ...parts].join("/");
}

// --- the token and the API ----------------------------------------------------------------

function authRequired() {
  return document.querySelector('meta[name="raycurv-auth"]').content === "bearer";
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class AuthError extends Error {}
class ApiError extends Error {}

function showTokenForm(message) {
  const form = document.getElementById("token-form");
  form.hidden = false;
  document.getElementById("auth-message").textContent = message || "";
  document.getElementById("view").replaceChildren();
  document.getElementById("token-input").focus();
}

async function request(path) {
  if (authRequired() && !token()) throw new AuthError("");
  const headers = token() ? {Authorization: "Bearer " + token()} : {};
  const response = await fetch(path, {headers});
  if (response.ok) return response;
  let detail = response.statusText;
  try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
  if (response.status === 401) throw new AuthError(detail);
  throw new ApiError(detail);
}

async function api(path) { return (await request(path)).json(); }

async function imageUrl(run, sampleId, size) {
  const path = `v1/runs/${encodeURIComponent(run)}/samples/${sampleId}/image?size=${size}`;
  const url = URL.createObjectURL(await (await request(path)).blob());
  blobUrls.push(url);
  return url;
}

function image(run, sampleId, size, className) {
  const img = el("img", {alt: `sample ${sampleId}`, class: className || null,
                         "data-sample-id": sampleId});
  imageUrl(run, sampleId, size).then(
    (url) => { img.src = url; },
    (err) => { img.alt = err.message; img.title = err.message; img.classList.add("missing"); });
  return img;
}

// --- routes -------------------------------------------------------------------------------

function parseHash() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return {parts, params: new URLSearchParams(query || "")};
}

function crumbs(...items) {
  const nav = document.getElementById("crumbs");
  nav.replaceChildren(...items.flatMap((item, i) => [
    i ? " / " : "", item.href ? el("a", {href: item.href}, item.text) : item.text]));
}

async function render() {
  const serial = ++renderSerial;
  for (const url of blobUrls.splice(0)) URL.revokeObjectURL(url);
  const error = document.getElementById("error");
  error.hidden = true;
  document.getElementById("token-form").hidden = true;
  document.getElementById("forget-token").hidden = !token();
  const view = document.getElementById("view");
  const {parts, params} = parseHash();
  try {
    let content;
    if (parts[0] === "runs" && parts.length === 2) content = await runPage(parts[1]);
    else if (parts[0] === "runs" && parts[2] === "gallery") content = await galleryPage(parts[1], params);
    else if (parts[0] === "runs" && parts[2] === "samples" && parts.length === 4) {
      content = await samplePage(parts[1], parts[3]);
    } else content = await runsPage();
    if (serial === renderSerial) view.replaceChildren(content);
  } catch (err) {
    if (serial !== renderSerial) return;
    if (err instanceof AuthError) { showTokenForm(err.message); return; }
    view.replaceChildren();
    error.textContent = err.message;
    error.hidden = false;
  }
}

async function runsPage() {
  crumbs({text: "runs"});
  const body = await api("v1/runs");
  const rows = body.runs.map((run) => el("tr", {},
    el("td", {}, el("a", {href: runHref(run.name)}, run.name)),
    el("td", {}, run.metadata.dataset || "–"), el("td", {}, fmt(run.rows)),
    el("td", {}, run.status === "serving" ? "serving" : `failed: ${run.last_error}`),
    el("td", {}, run.status === "serving" ? el("a", {href: runHref(run.name, "gallery")}, "gallery") : "")));
  return el("div", {}, el("h1", {}, "Runs"),
    el("table", {id: "runs"}, el("thead", {}, el("tr", {}, ["run", "dataset", "samples", "status", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)));
}

// --- the run page: numbers and figures ------------------------------------------------------

async function runPage(run) {
  crumbs({text: "runs", href: "#/"}, {text: run});
  const [summary, hist, names] = await Promise.all([
    api(`v1/runs/${encodeURIComponent(run)}/summary`),
    api(`v1/runs/${encodeURIComponent(run)}/histogram`),
    api(`v1/runs/${encodeURIComponent(run)}/classes`)]);
  const facts = [["samples", summary.rows], ["classes", summary.classes],
    ["epochs scored", summary.epochs_scored], ["corrupted labels", summary.corrupted],
    ["injected copies", summary.duplicates],
    ["median curvature", summary.curvature && summary.curvature.quantiles["0.5"]],
    ["99th percentile", summary.curvature && summary.curvature.quantiles["0.99"]]];
  const detection = summary.detection.map((d) => el("tr", {},
    el("td", {}, d.target), el("td", {}, d.score), el("td", {}, fmt(d.positives)),
    el("td", {}, fmt(d.auroc, 3)), el("td", {}, fmt(d.average_precision, 3)),
    el("td", {}, fmt(d.precision_at_k, 3))));
  const figures = el("div", {class: "figures"},
    histogramFigure(hist), perClassFigure(summary.by_label, names.names));
  const page = el("div", {id: "run-page"},
    el("h1", {}, `Run ${run}`),
    el("p", {}, el("a", {href: runHref(run, "gallery")}, "Gallery of the most memorized samples"),
      " · ", el("a", {href: runHref(run, "gallery") + "?order=asc"}, "least memorized")),
    el("table", {id: "facts"}, facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, fmt(v))))),
    el("h2", {}, "Figures"), figures,
    detection.length ? el("div", {}, el("h2", {}, "How well each score finds the injected noise"),
      el("table", {id: "detection"}, el("tr", {}, ["target", "score", "positives", "AUROC", "AP", "precision@k"].map((h) => el("th", {}, h))), detection)) : null);
  api(`v1/runs/${encodeURIComponent(run)}/epochs`).then(
    (band) => figures.append(epochFigure(band, null, "Curvature of all samples per epoch")),
    (err) => figures.append(el("p", {class: "muted"}, err.message)));
  return page;
}

function axes(width, height, pad, xLabel, yLabel) {
  return [svg("line", {x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b, stroke: "#888"}),
    svg("line", {x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b, stroke: "#888"}),
    svg("text", {x: (width + pad.l) / 2, y: height - 4, "text-anchor": "middle"}, document.createTextNode(xLabel)),
    svg("text", {x: 10, y: pad.t - 6}, document.createTextNode(yLabel))];
}

function figure(chart, caption, legend) {
  return el("figure", {}, chart, legend || null, el("figcaption", {}, caption));
}

function histogramFigure(hist) {
  const width = 420, height = 240, pad = {l: 40, r: 10, t: 20, b: 34};
  const kinds = Object.keys(hist.counts).filter((k) => hist.counts[k].some((c) => c > 0));
  const bins = hist.edges.length - 1;
  const top = Math.max(1, ...kinds.flatMap((k) => hist.counts[k]));
  const colors = {clean: "#4c72b0", corrupted: "#dd5151", duplicate: "#e39b22"};
  const bw = (width - pad.l - pad.r) / bins;
  const y = (c) => height - pad.b - (Math.log10(1 + c) / Math.log10(1 + top)) * (height - pad.t - pad.b);
  const bars = kinds.flatMap((kind, k) => hist.counts[kind].map((c, i) => c ? svg("rect", {
    x: pad.l + i * bw + (k * bw) / kinds.length, width: Math.max(1, bw / kinds.length - 0.5),
    y: y(c), height: height - pad.b - y(c), fill: colors[kind], "data-kind": kind}) : null));
  const ticks = [0, Math.floor(bins / 2), bins].map((i) => svg("text", {
    x: pad.l + i * bw, y: height - pad.b + 12, "text-anchor": "middle"},
    document.createTextNode(fmt(hist.edges[i], 2))));
  const chart = svg("svg", {width, height, id: "histogram", role: "img", "aria-label": "curvature histogram"},
    axes(width, height, pad, "curvature (log scale)", "samples (log scale)"), bars, ticks);
  const legend = el("div", {class: "legend"}, kinds.map((k) => el("span", {}, el("i", {class: `swatch ${k}`}), k)));
  return figure(chart, "Curvature by kind of sample", legend);
}

function perClassFigure(byLabel, names) {
  const width = 420, height = 240, pad = {l: 40, r: 10, t: 20, b: 34};
  const top = Math.max(1e-12, ...byLabel.map((b) => b.mean_curvature));
  const bw = (width - pad.l - pad.r) / Math.max(1, byLabel.length);
  const bars = byLabel.map((b, i) => {
    const h = (b.mean_curvature / top) * (height - pad.t - pad.b);
    return svg("rect", {x: pad.l + i * bw + 1, width: Math.max(1, bw - 2), y: height - pad.b - h,
      height: h, fill: "#4c72b0"}, svg("title", {}, document.createTextNode(
        `${className(b.label, names)}: mean ${fmt(b.mean_curvature)}, ${b.count} samples, ${b.corrupted} corrupted`)));
  });
  const labels = byLabel.length <= 20 ? byLabel.map((b, i) => svg("text", {
    x: pad.l + (i + 0.5) * bw, y: height - pad.b + 12, "text-anchor": "middle"},
    document.createTextNode(String(b.label)))) : [];
  const chart = svg("svg", {width, height, id: "per-class", role: "img", "aria-label": "mean curvature per class"},
    axes(width, height, pad, "given label", "mean curvature"), bars, labels);
  return figure(chart, "Mean curvature per class");
}

function epochFigure(band, sample, caption) {
  const width = 420, height = 240, pad = {l: 48, r: 10, t: 20, b: 34};
  const values = [...band.p10, ...band.p90, ...(sample ? sample.curvature : [])].filter((v) => v !== null && v > 0);
  const epochs = [...band.epochs, ...(sample ? sample.epochs : [])];
  if (!values.length || !epochs.length) return el("p", {class: "muted"}, "No per-epoch curvature to show.");
  const [lo, hi] = [Math.log10(Math.min(...values)), Math.log10(Math.max(...values))];
  const [e0, e1] = [Math.min(...epochs), Math.max(...epochs)];
  const x = (e) => pad.l + ((e - e0) / Math.max(1, e1 - e0)) * (width - pad.l - pad.r);
  const y = (v) => height - pad.b - ((Math.log10(v) - lo) / Math.max(1e-9, hi - lo)) * (height - pad.t - pad.b);
  const points = (es, vs) => es.map((e, i) => vs[i] > 0 ? `${x(e).toFixed(1)},${y(vs[i]).toFixed(1)}` : null).filter(Boolean);
  const upper = points(band.epochs, band.p90), lower = points(band.epochs, band.p10).reverse();
  const parts = [axes(width, height, pad, "epoch", "curvature (log scale)"),
    svg("polygon", {points: [...upper, ...lower].join(" "), fill: "#ccc", class: "band"}),
    svg("polyline", {points: points(band.epochs, band.median).join(" "), fill: "none", stroke: "#222", "stroke-width": 1.5, class: "median"})];
  if (sample) {
    const pts = points(sample.epochs, sample.curvature);
    parts.push(svg("polyline", {points: pts.join(" "), fill: "none", stroke: "#d62728", "stroke-width": 2, class: "curve"}));
    for (const p of pts) {
      const [cx, cy] = p.split(",");
      parts.push(svg("circle", {cx, cy, r: 2.5, fill: "#d62728", class: "point"}));
    }
  }
  for (const e of [e0, e1]) {
    parts.push(svg("text", {x: x(e), y: height - pad.b + 12, "text-anchor": "middle"}, document.createTextNode(String(e))));
  }
  const chart = svg("svg", {width, height, id: sample ? "sample-curve" : "run-curve", role: "img", "aria-label": caption}, parts);
  const legend = el("div", {class: "legend"},
    sample ? el("span", {}, el("i", {class: "swatch sample"}), `sample ${sample.sample_id}`) : null,
    el("span", {}, el("i", {class: "swatch median"}), "median"),
    el("span", {}, el("i", {class: "swatch band"}), "10–90 %"));
  return figure(chart, caption, legend);
}

// --- the gallery ----------------------------------------------------------------------------

function className(label, names) {
  return names && label >= 0 && label < names.length ? `${label} ${names[label]}` : String(label);
}

function badges(row) {
  return [row.corrupted ? el("span", {class: "badge corrupted"}, "corrupted") : null,
    row.duplicate_of !== null ? el("span", {class: "badge duplicate"}, `copy of ${row.duplicate_of}`) : null,
    row.suspected ? el("span", {class: "badge suspected"}, `suspected: ${row.suspected}`) : null];
}

function select(name, label, options, value) {
  return el("label", {}, label, el("select", {name, id: `filter-${name}`},
    options.map(([v, text]) => el("option", {value: v, selected: String(v) === String(value)}, text))));
}

async function galleryPage(run, params) {
  crumbs({text: "runs", href: "#/"}, {text: run, href: runHref(run)}, {text: "gallery"});
  const order = params.get("order") === "asc" ? "asc" : "desc";
  const k = PAGE_SIZES.includes(Number(params.get("k"))) ? Number(params.get("k")) : 24;
  const page = Math.max(0, Number.parseInt(params.get("page") || "0", 10) || 0);
  const query = new URLSearchParams({k, order, offset: page * k});
  for (const name of ["label", "corrupted", "injected"]) if (params.get(name)) query.set(name, params.get(name));
  const [summary, names, top] = await Promise.all([
    api(`v1/runs/${encodeURIComponent(run)}/summary`),
    api(`v1/runs/${encodeURIComponent(run)}/classes`),
    api(`v1/runs/${encodeURIComponent(run)}/top?${query}`)]);
  const controls = el("form", {class: "controls", id: "filters"},
    select("order", "order", [["desc", "most memorized first"], ["asc", "least memorized first"]], order),
    select("label", "class", [["", "all classes"], ...summary.by_label.map((b) => [b.label, className(b.label, names.names)])], params.get("label") || ""),
    summary.corrupted ? select("corrupted", "label noise", [["", "all"], ["true", "corrupted labels"], ["false", "clean labels"]], params.get("corrupted") || "") : null,
    summary.duplicates ? select("injected", "injected copies", [["", "all"], ["true", "injected copies"], ["false", "no copies"]], params.get("injected") || "") : null,
    select("k", "per page", PAGE_SIZES.map((n) => [n, String(n)]), k));
  controls.addEventListener("change", () => {
    const next = new URLSearchParams();
    for (const [name, value] of new FormData(controls)) if (value !== "") next.set(name, value);
    location.hash = runHref(run, "gallery") + "?" + next;
  });
  const first = page * k;
  const cards = top.rows.map((row) => el("a", {class: "card", href: runHref(run, "samples", row.sample_id),
      "data-rank": row.rank, "data-sample-id": row.sample_id},
    image(run, row.sample_id, 96),
    el("div", {class: "line"}, el("span", {class: "rank"}, `#${row.rank}`), ` · sample ${row.sample_id}`),
    el("div", {class: "line"}, `label ${className(row.label, names.names)}`),
    el("div", {class: "line"}, `predicted ${className(row.final_pred, names.names)}`),
    el("div", {class: "line"}, `curvature ${fmt(row.curvature)}`),
    el("div", {class: "line muted"}, `percentile ${fmt(row.percentile, 3)}`),
    el("div", {}, badges(row))));
  const pageLink = (p, text, id) => {
    const next = new URLSearchParams(params);
    next.set("page", p);
    return el("a", {href: runHref(run, "gallery") + "?" + next, id}, text);
  };
  const pager = (ids) => el("div", {class: "pager"},
    page > 0 ? pageLink(page - 1, "previous", ids && "previous-page") : null,
    el("span", {id: ids && "showing"}, top.total ? `${first + 1}–${first + top.rows.length} of ${fmt(top.total)}` : "no samples match"),
    first + top.rows.length < top.total ? pageLink(page + 1, "next", ids && "next-page") : null);
  return el("div", {}, el("h1", {}, `${order === "asc" ? "Least" : "Most"} memorized samples of ${run}`),
    controls, pager(true), el("div", {class: "gallery", id: "gallery"}, cards), pager(false));
}

// --- one sample -------------------------------------------------------------------------------

async function samplePage(run, rawId) {
  crumbs({text: "runs", href: "#/"}, {text: run, href: runHref(run)},
    {text: "gallery", href: runHref(run, "gallery")}, {text: `sample ${rawId}`});
  const base = `v1/runs/${encodeURIComponent(run)}`;
  const [body, names, summary] = await Promise.all([
    api(`${base}/samples/${encodeURIComponent(rawId)}`), api(`${base}/classes`), api(`${base}/summary`)]);
  const row = body.sample;
  const label = (v) => className(v, names.names);
  const facts = [["rank", `${fmt(row.rank)} of ${fmt(summary.rows)}`], ["percentile", fmt(row.percentile, 4)],
    ["curvature", fmt(row.curvature)], ["epochs scored", row.epochs_scored], ["csl", fmt(row.csl)],
    ["given label", label(row.label)], ["original label", label(row.original_label)],
    ["predicted", label(row.final_pred)], ["confidence in the given label", fmt(row.final_confidence, 3)],
    ["final loss", fmt(row.final_loss)], ["corrupted", row.corrupted ? "yes" : "no"],
    ["injected copy of", row.duplicate_of === null ? "–" : row.duplicate_of],
    ["suspected", row.suspected || "–"]];
  const curve = el("div", {id: "curve"}, el("p", {class: "muted"}, "loading the per-epoch curve…"));
  const group = el("div", {id: "duplicates"}, el("p", {class: "muted"}, "looking for duplicates…"));
  Promise.all([api(`${base}/samples/${row.sample_id}/epochs`), api(`${base}/epochs`)]).then(
    ([sample, band]) => curve.replaceChildren(epochFigure(band, sample, "Curvature of this sample per epoch")),
    (err) => curve.replaceChildren(el("p", {class: "muted"}, err.message)));
  api(`${base}/samples/${row.sample_id}/duplicates`).then(
    (dups) => group.replaceChildren(duplicateGroup(run, dups, row.sample_id, label)),
    (err) => group.replaceChildren(el("p", {class: "muted"}, err.message)));
  return el("div", {id: "sample-page", "data-sample-id": row.sample_id},
    el("h1", {}, `Sample ${row.sample_id} of ${run}`),
    el("div", {class: "sample"},
      image(run, row.sample_id, 224, "big"),
      el("div", {}, el("table", {id: "sample-facts"}, facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))),
        el("div", {}, badges(row))),
      curve),
    el("h2", {}, "Duplicate group"), group);
}

function duplicateGroup(run, dups, sampleId, label) {
  const searched = `searched: ${dups.searched.join(", ")}${dups.not_searched ? ` (exact copies not searched: ${dups.not_searched})` : ""}`;
  if (!dups.rows.length) return el("div", {}, el("p", {}, "No known duplicates."), el("p", {class: "muted"}, searched));
  return el("div", {},
    dups.conflicting ? el("p", {class: "error"}, "Conflicting labels: the same image carries different labels.") : null,
    el("div", {class: "group"}, dups.rows.map((r) => el("a", {class: "thumb", href: runHref(run, "samples", r.sample_id),
      "data-sample-id": r.sample_id}, image(run, r.sample_id, 96),
      `${r.sample_id === sampleId ? "this sample" : `sample ${r.sample_id}`}`, el("br"),
      `label ${label(r.label)} · #${r.rank}`))),
    el("p", {class: "muted"}, searched));
}

// --- start --------------------------------------------------------------------------------

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
  document.getElementById("token-input").value = "";
  render();
});
document.getElementById("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  render();
});
window.addEventListener("hashchange", render);
render();
