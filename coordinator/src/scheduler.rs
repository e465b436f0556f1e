//! Placing tasks: eligibility and the four strategies.
