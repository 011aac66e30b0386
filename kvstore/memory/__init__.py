"""Where decoded KV lives and when it leaves: tiers, byte budgets, eviction, sharing, warm-up."""
