"""One calibration session of a new person -> subject bundle. Built in its own issue; nothing here yet."""
