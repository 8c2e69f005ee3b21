"""The Files API and the Batch API: uploads, and batches of requests run on the capacity online
traffic leaves free (`BatchRunner` owns a batch's lifecycle)."""
