"""Source metadata: reading parts and their canonical columns, filter rules, id lists, language
detection, file transfers."""
