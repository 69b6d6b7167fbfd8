"""One answer across the mesh: its leader, its members, and the node's tables of them.

Owns, by module:
- every message in: `router` (one table: who may send it, which handler);
- the node's tables: `roles` (id sessions led and joined, failover), `origin` (a client's
  stream, whatever the mode), `text_table` (text sessions led and joined);
- what every leader is: `lead` (roster, term, deposition), `round` (the wait for every
  member's reply: resends, bounds, deadlines);
- the id session: `leader` (the decode loop), `resume` (its takeover), `speculate`
  (speculative rounds), `member`, `answer` (the answer's text as tokens commit);
- the text session: `text_leader`, `text_resume`, `text_member`;
- `deadlines` (every bound on a wait), `stats` and `summary` (the one summary shape).
Does not: open sockets or load models. The node hands the tables a `ports.NodePort` (send
by node id, answer a client, spawn, count a refusal, the lease, the engine). Imports
`wire`, `mesh`, `fusion` and `config`; never `ui` or `node`.
"""
