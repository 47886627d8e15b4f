"""Where things are on the ground: camera models, georeferencing, flights; no store or HTTP."""
