"""One answer across the mesh: its leader, its members, and the node's tables of them.

Owns: the round a leader waits on (`round`), the id session's leader (`leader`, and its
speculative subclass `speculate`) and member (`member`), the text session's leader
(`text_leader`, resumed by `text_resume`) and member (`text_member`), every bound on a
wait (`deadlines`), measurements and the one summary shape (`stats`, `summary`), and the
node's session tables with who may send each session message (`roles`).
Does not: open sockets or load models: the node hands sessions a `send` function and an
engine (`ports` says what a session may ask of its node). Imports `wire`, `mesh`,
`fusion` and `config`; never `ui` or `node`.
"""
