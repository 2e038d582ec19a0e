"""Memory tiers, expert movement and offloaded execution (host store, slot cache, policy, prefetch)."""
