"""Who is in the mesh: discovery, membership, and what a node holds from the OS.

Owns: mDNS advertise/browse (`discovery`), the pure state of live peers and the per-session
election (`membership`), which learned addresses a node dials (`gossip`), file
descriptors and the identity lock (`process`).
Does not: run sessions, or send anything (the node wires the transport). Imports `wire`
and `config` only.
"""
