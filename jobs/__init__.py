"""Batch long-video jobs: a Redis Streams queue, workers that stream-encode fMP4 and upload it to S3."""
