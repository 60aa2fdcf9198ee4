"""The search: recipes of transforms, measured candidates, the accuracy budget, the Pareto front."""
