"""Running a job: the driver (schedules), the executor seam and its Ray and in-process
implementations, the retry policy, and the worker that turns units into committed rows."""
