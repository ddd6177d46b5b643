"""The dev kit: tiny random models for fast tests, synthetic tasks, and the Subj slice the demo ships."""

from pathlib import Path

# 200/200 class-balanced slice of Subj (MIT, as in ../shared/data): the demo's task, packaged so it runs offline.
DEMO_TASK_DIR = Path(__file__).parent / "demo_tasks" / "subj"
