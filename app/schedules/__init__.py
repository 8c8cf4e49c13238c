"""Periodic jobs: schedules in Postgres, each due slot made into exactly one job."""
