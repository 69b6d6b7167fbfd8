"""What travels between nodes, and how it is checked.

Owns: one frozen dataclass per message (`messages`), the versioned encode and strict
decode (`protocol`), meaning-level bounds a receiver applies (`bounds`), the ZeroMQ
sockets with their counters (`transport`) and the per-address connection cap
(`admission`), the mesh key and CURVE keys (`security`).
Does not: decide who may send a message in a session (that is `sessions.roles`), or hold
any session state. Imports nothing else of dwarfmesh but `config`.
"""
