"""Transforms: each technique is a function ``Model -> Model`` configured by a frozen dataclass."""
