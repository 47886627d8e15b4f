"""The watched inbox: files dropped into a folder become jobs, exactly once."""
