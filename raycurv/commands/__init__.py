"""One module per `raycurv` verb, each with ``add_arguments(parser)`` and ``run(args) -> int``.

The verbs only turn flags into specs and call the library; they hold no logic of their own.
"""
