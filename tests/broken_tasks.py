"""A task module that fails at import, as a half-finished deploy does."""

raise ValueError("DATABASE_URL is not set")
