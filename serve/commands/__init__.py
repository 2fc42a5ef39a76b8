"""``mose`` CLI command groups: one module per group, each with ``add_parser(subparsers)``.

Handlers import heavy libraries (torch, ray) lazily so ``mose --help`` stays fast.
"""
