"""HTTP layer: thin routers that parse, call service functions and map errors."""
