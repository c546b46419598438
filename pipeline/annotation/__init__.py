"""The annotation run: orchestration (run), what is asked and the row it makes (tasks), images to
pixels (decode), parquet parts (sink), what is left to do (resume), the run's record (summary), and
images with their boxes drawn (preview)."""
