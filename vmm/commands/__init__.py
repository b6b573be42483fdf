"""One module per ``vmm`` command, each with ``main(args) -> int``.

``vmm.cli`` builds the parser and imports the module of the command that
runs, so each command loads only what it uses.
"""
