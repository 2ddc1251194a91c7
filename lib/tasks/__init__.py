"""The MechaRule tasks: each module `lib.tasks.<name>_task` exports a `TASK_SPEC` instance."""
