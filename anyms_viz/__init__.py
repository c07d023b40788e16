"""anyms_viz: widgets and figure makers for AnyMS runs. It reads ``anyms_core.Run`` objects only."""
