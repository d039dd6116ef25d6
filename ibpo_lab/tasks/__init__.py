"""Tasks: prompts, verifiers (terminal rewards) and step labels. ``get_task(name)`` builds one."""

from ibpo_lab.tasks.base import DEFAULT_TEMPLATES, Example, Score, Task, get_task, list_tasks, register_task

# built-in tasks register themselves on import
