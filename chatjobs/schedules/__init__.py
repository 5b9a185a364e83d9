"""Schedules: cron fire times, template variables and the firing decisions, all pure."""
