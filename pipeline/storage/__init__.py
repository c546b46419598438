"""Files written whole (local or object storage), locks and leases, and the names in an output folder."""
