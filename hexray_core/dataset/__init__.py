"""A dataset of traces (one folder): its layout, the writer that records it, the reader and aggregation."""
