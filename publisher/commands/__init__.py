"""The publisher's subcommands, one module each: its options and its run function
(docs/DESIGN.md#commands). ``publisher/cli.py`` holds the top-level parser and dispatch."""
