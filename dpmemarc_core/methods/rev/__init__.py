"""The reversible network (`rev`): backbone blocks as two coupled streams, backward by segment replay."""
