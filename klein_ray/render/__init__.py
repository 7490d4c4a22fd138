"""The I/O around the model: reference images fetched and decoded, model sources resolved and
synced, rendered images encoded. No torch here; the model layer does the rendering."""
