"""The web console, the API docs with local assets, and the monitoring files."""
