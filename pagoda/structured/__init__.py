"""Structured outputs: a constraint (JSON schema, regex, choice, grammar) as a token mask.

grammar.py turns a request's constraint into a grammar and checks it; it imports no torch,
so the API server answers a bad constraint with a 400 before the engine sees it.
matcher.py is the engine side: one matcher per request, which fills the allowed-token mask
each step, advances on the accepted token and names tokens the grammar forces.
"""
