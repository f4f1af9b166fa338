"""Data: the embedded synthetic world, its pixel checker, raw shard reading and writing."""
