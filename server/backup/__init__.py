"""Backups: online snapshot (snapshot.py), the file format (format.py), verify and restore (restore.py),
scheduled backups in the server (schedule.py). See docs/disaster-recovery.md."""
