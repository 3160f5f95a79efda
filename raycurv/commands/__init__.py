"""One module per `raycurv` verb, each with ``add_arguments(parser)`` and ``run(args) -> int``.

The verbs only turn flags into specs and call the library; they hold no logic of their own.
Each imports the library inside ``run``: building the parser imports every verb's module, and
``raycurv --help`` or a bad flag must answer before torch and Ray load (seconds).
"""
