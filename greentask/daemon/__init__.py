"""The task daemon: one master that binds and forks, worker processes that serve tasks."""
