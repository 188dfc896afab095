"""The front doors: consolidate, reshape and verify, each discover -> plan -> execute."""
