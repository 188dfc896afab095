"""Discovery: which files a checkpoint holds and what they say (the Layout)."""
