"""BFCL v3: data loading, the AST and multi-turn checkers, leaderboard aggregation and the generation loop."""
