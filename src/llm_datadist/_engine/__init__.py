"""Private engine: registry, pools, planner, links and the control plane behind the public facade."""
