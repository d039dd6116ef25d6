"""Tasks: prompts, verifiers (terminal rewards) and step labels. ``get_task(name)`` builds one."""

from ibpo_lab.tasks.base import DEFAULT_TEMPLATES, Example, Score, Task, get_task, list_tasks, register_task

# built-in tasks register themselves on import
import ibpo_lab.tasks.synthetic  # noqa: E402,F401  (registers "synthetic")
import ibpo_lab.tasks.gsm8k  # noqa: E402,F401  (registers "gsm8k")
import ibpo_lab.tasks.mathtask  # noqa: E402,F401  (registers "math")
import ibpo_lab.tasks.humaneval  # noqa: E402,F401  (registers "humaneval")
import ibpo_lab.tasks.reasoning_gym  # noqa: E402,F401  (registers the "rg:<dataset>" family)
