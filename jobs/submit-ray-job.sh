#!/usr/bin/env bash
# Submit a render to an existing Ray cluster as a Ray Job. The submission id is derived from the
# output, so a scheduler that retries the same submission is rejected instead of running twice;
# after a failure, resubmit with a suffix and the job resumes from what is committed.
set -euo pipefail
MANIFEST=$1 OUTPUT=$2 CONFIG=${3:-jobs/klein-4b.yaml}
ID="klein-$(printf %s "$OUTPUT" | sha256sum | cut -c1-12)${RETRY:+-$RETRY}"
ray job submit --submission-id "$ID" --working-dir . -- \
  klein-ray render "$MANIFEST" --output "$OUTPUT" --config "$CONFIG" --no-progress
