"""Example tasks, served by the shipped ``conf/worker.ini``."""
