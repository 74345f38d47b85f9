"""The engines behind one seam: SQL spelled for DuckDB or Spark, the Spark session, its daemon,
spark-submit entry point and UDFs."""
