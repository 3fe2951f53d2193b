%% Writes the etf_translate seed corpus: real term_to_binary output of the
%% kinds of messages a gateway relays. Run from the repository root:
%%   erl -noshell -eval 'c:c("fuzz/etf_seeds.erl", [{outdir, "/tmp"}]), etf_seeds:write("fuzz/corpus/etf_translate"), halt().'
-module(etf_seeds).
-export([write/1]).

write(Dir) ->
    Self = self(),
    Ref = make_ref(),
    Alias = alias(),
    Fun = fun(X) -> {X, Self, Ref} end,
    Terms = [
        {gen_call, {'$gen_call', {Self, [alias | Alias]}, {get, key}}},
        {send_self, {ping, Self}},
        {ref, Ref},
        {nested, #{pids => [Self, Self], ref => Ref, tuple => {Self, <<"bin">>, "str", 3.14}}},
        {fun_env, Fun},
        {export, fun lists:reverse/1},
        {port, hd(erlang:ports())},
        {bigint, {1 bsl 100, -(1 bsl 70), 12345678901234567890}},
        {improper, [Self | Ref]},
        {atoms, ['', 'ünïcødé', list_to_atom(lists:duplicate(255, $a))]},
        {large_tuple, list_to_tuple(lists:seq(1, 300))},
        {binary, binary:copy(<<"x">>, 1000)},
        {bitstring, <<1:3>>},
        {pg_join, {join, wan, chat, [Self]}},
        {down, {'DOWN', Ref, process, Self, normal}},
        {compressed, term_to_binary(lists:duplicate(100, Self), [compressed])}
    ],
    lists:foreach(
        fun({Name, T}) ->
            Bin = case Name of
                compressed -> T;
                _ -> term_to_binary(T)
            end,
            ok = file:write_file(filename:join(Dir, atom_to_list(Name)), Bin)
        end,
        Terms).
