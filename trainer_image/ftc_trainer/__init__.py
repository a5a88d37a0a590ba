"""ftc trainer image: the prepare and train steps (`ftc-trainer prepare|train`)."""
