"""Planning: pure decisions about what goes where (consolidation, reshape, TP rules, maps)."""
