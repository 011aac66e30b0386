"""Agent sessions: a task's working memory, kept and pruned turn by turn."""
