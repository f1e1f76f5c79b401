"""Long operations with state and progress: merge (snapshot delete), flatten, later migration."""
