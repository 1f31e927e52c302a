_rhaas_completion() {
    local IFS=$'\n'
    local response

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD _RHAAS_COMPLETE=bash_complete $1)

    for completion in $response; do
        IFS=',' read -r type value <<< "$completion"

        if [[ $type == 'dir' ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == 'file' ]]; then
            COMPREPLY=()
            compopt -o default
        elif [[ $type == 'plain' ]]; then
            local quoted
            printf -v quoted '%q' "$value"
            COMPREPLY+=("$quoted")
        fi
    done

    return 0
}

_rhaas_completion_setup() {
    complete -o nosort -F _rhaas_completion rhaas
}

_rhaas_completion_setup;
