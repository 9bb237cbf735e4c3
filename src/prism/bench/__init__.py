"""What eval and study share: benchmark loaders (`data`), cached scoring (`scoring`) and
bootstrap statistics (`stats`)."""
