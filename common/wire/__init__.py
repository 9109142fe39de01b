"""The wire: generated protobuf schema, framing and page/tag codecs."""
