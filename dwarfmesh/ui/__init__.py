"""What a person or a client program touches: the CLI, the chat TUI, the HTTP API.

Owns: running a command and one-line errors (`cli`), what the commands accept
(`cli_args`), a node's process from start to exit (`cli_node`), the client side of the
node protocol (`client`), `dwarfmesh chat` (`tui`, `tui_render`), the OpenAI-compatible
server (`api`, `http11`, `openai_compat`).
Does not: take part in a session; it talks to a node as a client does. Nothing below
imports it.
"""
